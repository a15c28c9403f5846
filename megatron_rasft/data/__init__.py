"""Problems, tokenisation and batching: from records and text to training sequences."""
