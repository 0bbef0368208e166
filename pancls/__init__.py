"""pancls: pancreatic tumour subtype classification with the tSP classifier."""
__version__ = "0.1.0"
