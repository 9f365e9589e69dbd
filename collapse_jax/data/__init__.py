"""Data for the experiments: MNIST images for the VAE (`mnist`); text and tokenizers for the language model."""
