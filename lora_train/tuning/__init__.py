"""Tuning advice: the advisor and live diagnosis (`advisor`), the LR range test (`lr_finder`)."""
