"""The training side: loader, student and transfer strategies, teacher signals, session set-up, optimiser, DDP, loop, checkpoints, evaluation, ensembles."""
