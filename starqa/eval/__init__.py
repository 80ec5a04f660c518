"""`starqa eval`: Star Attention against full attention on the same model, prompts and greedy decoding.

    tasks.py     RULER-style synthetic cases (and own-document cases), generated locally and deterministically
                 (word lists: starqa/words.py, shared with the retrieval-head calibration)
    haystack.py  haystacks (repetitive noise, essay prose) and needle placement; fitting text to a token length
    prose.py     the essay prose shipped for the real-text haystack
    qa_file.py   question/answer JSONL files and the bundled sample document
    prompts.py   a case -> context ids + query ids, through starqa.documents.tokens (the same layout `ask` uses)
    scoring.py   RULER's string_match_all / string_match_part
    runner.py    runs cases over the attention modes with a StarEngine: timing, peak memory, resume file
    summary.py   per-case records -> per-task and overall rows; Rich table, JSON document, plot
    command.py   the `starqa eval` command
"""
