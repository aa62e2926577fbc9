"""Generate text with a (trained) model. See ``colossal_llama/inference/cli.py`` for the flags."""
from colossal_llama.inference.cli import main

if __name__ == "__main__":
    main()
