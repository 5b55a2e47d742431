"""Adapter kinds by name: BOFT (ours) and PEFT's LoRA and OFT as same-budget baselines."""
