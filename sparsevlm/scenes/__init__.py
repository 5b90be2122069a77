"""Procedurally generated scenes, questions and the embedded scenes-llava model trained on them."""
