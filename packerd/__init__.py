"""packerd: streams a text dataset, tokenizes it, packs fixed-length sequences into LZ4 chunks, announces them."""
