"""The networks and their exact conversion: fusion math, the RepVGG block, the model and its registry, baselines."""
