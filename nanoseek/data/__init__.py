"""Training data: packing (pretraining stream, SFT packed with document masks) and the corpus builder."""
