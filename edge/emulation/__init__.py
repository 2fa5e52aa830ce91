"""Emulated links and devices for ``edge bench sweep``; benchmark tools, not part of the runtime.

* :mod:`.netns`: two network namespaces joined by a veth pair, bandwidth shaped with
  ``tc qdisc tbf`` on both ends (root only; nothing outside the namespaces is touched).
* :mod:`.proxy`: a user-space TCP proxy adding RTT/2 of delay each way (this kernel has no
  ``netem``).
* :mod:`.dilation`: a slower device by time dilation: each device-side inference is
  followed by a sleep of (factor - 1) times its measured duration.
* :mod:`.device`: the device side of one scenario, run inside the device namespace.
* :mod:`.report`: the sweep's summary arithmetic and plot.
"""

from __future__ import annotations

__all__: list[str] = []
