"""One decoder block at a time: the layer problem, the solver lookup, parallel lanes, block tuning."""
