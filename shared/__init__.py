"""What packerd and trainerd agree on: the chunk format, the manifest, the notification protocol, config,
and the tokenizer (loading one, and the built-in corpus and tokenizer)."""
