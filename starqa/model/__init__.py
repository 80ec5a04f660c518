"""The model: the catalogue of named models, GGUF conversion, resolving a model spec to a loaded directory, the decoder
itself, and its weights packed to 4/8 bits for decoding.
"""
