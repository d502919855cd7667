"""Built-in tasks (``digits``, ``breast_cancer``, ``synthetic``), registered as entry points
of the ``fedcoord.tasks`` group and resolved by :func:`coordinator.tasks.load_task`."""
