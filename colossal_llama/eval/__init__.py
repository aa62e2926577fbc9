"""Evaluation: multiple-choice accuracy (``multiple_choice``), bits per character (``bits_per_char``), the
``evaluate.py`` CLI (``cli``) and the local chat web page (``web``)."""
