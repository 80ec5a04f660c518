"""Documents to tokens: text extraction from PDF and text files (pages), file decoding, the prompt layout, the
tokenizers, and where each token and block sits in the text.
"""
