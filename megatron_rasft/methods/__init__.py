"""The methods' own arithmetic, free of servers and ranks: RASFT's weights, GRPO's group advantages,
the released selection of which problems a round rolls out."""
