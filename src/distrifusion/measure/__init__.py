"""Tools that measure the engine, above it: published architectures (`archs`, torch-free) and their
random-weight workloads, traffic counted at the communicator, timers, simulated ranks, the
`bench` command's figures, image quality against one process, and the link-aware planner."""
