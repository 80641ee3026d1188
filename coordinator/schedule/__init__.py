"""Schedule: datasets become tasks, tasks are leased and placed on cards (Ray or outbound), replicated, and volunteers stand by their trust."""
