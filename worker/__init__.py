"""The regsweep engine: registry client, policy, inventory, planner, executor, state."""
