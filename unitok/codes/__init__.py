"""Files of codes written by the tokenizer (``unitok encode``'s ``.npz``: :mod:`.npz`)."""
