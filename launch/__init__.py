"""Accelerate config files (launch/*.yaml) and `packtrain`, which runs packerd and trainerd together.

    packtrain                                   # the embedded offline default: pydoc corpus, tiny model, CPU
    packtrain --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer gpt2 --model 124m
    packtrain --accelerate-config launch/gpu-ddp.yaml --processes 8 --model 415m -- --lr 3e-4

The code is in launch/__main__.py (`python -m launch`).
"""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
