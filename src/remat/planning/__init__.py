"""The planning layer: chains, plans, the simulator and the strategies. Standard library and numpy only.

Nothing here imports torch (a test imports this package with torch made unimportable), so plans can be
made, simulated and tested on any chain of numbers: :class:`Profile` in, :class:`Plan` out.
"""
