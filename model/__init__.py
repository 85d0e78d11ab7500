"""Pure model code: config, linen decoder, tokenizers."""
