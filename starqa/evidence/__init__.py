"""Evidence for an answer: which passages of the stored text it drew on, quoted with their pages, and whether its
content is found in them (`grounded`). Data flows one way, each module importing only those listed before it
(and, from below, where each token and block sits in the text: starqa/documents/text_positions.py):

    scores.py          the attention scores of the row that predicts the next answer token over the held context
    heads.py           the model's retrieval heads: calibrated once per model on synthetic needles, recorded in
                       the store's models/ folder
    observer.py        the observer the engine feeds while an answer is decoded: the retrieval heads' most
                       attended tokens per step, merged exactly across ranks
    quotes.py          passages, the answer's content terms, the quotes and sources chosen, `grounded`, and how
                       they are printed
    collect.py         one answer end to end: the observer to hand the engine, then the Evidence about the stored
                       document version
"""
