# data/: prepare.py (JSONL -> tokens + loss mask + offsets) and synthetic.py (paper Table 1 lengths).
