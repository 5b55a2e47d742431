"""Control for diffusion models: the BOFT paper's light control encoder, ControlNets from a UNet, sampling with either."""
