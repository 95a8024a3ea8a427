"""Applications built on the library's public API (``unitok studio``); the library never imports them."""
