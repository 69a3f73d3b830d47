"""Adapter networks: injection into the models (peft) and the host file layouts (kohya names, SDXL SGM names)."""
