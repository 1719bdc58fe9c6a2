"""The shipped demo pair: its tokenizer, synthetic data and the recipe that trains it."""
