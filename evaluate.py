"""Evaluate a model: ``evaluate.py mc ...`` (multiple choice) or ``evaluate.py bpc ...`` (bits per character)."""
from colossal_llama.eval.cli import main

if __name__ == "__main__":
    main()
