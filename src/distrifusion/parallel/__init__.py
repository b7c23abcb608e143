"""`parallelize`: a single-device model or pipeline in, one rank's part of a patch-parallel model out.
It picks the family's adapter (`distrifusion.models`), installs its layers, wraps the forward
(split, run the strip, gather), and keeps the model under the engine as it changes (`ownership`)."""
