"""Capacity planning without a GPU: a cell's peak predicted part by part (exact parts from the model on the meta
device, the rest analytic or fitted), the coefficients and their fitting, GPU sizes, and ``fit``'s search by real
trials. Enters: ``CellConfig``s (from flags or a suite) and measured runs (to calibrate). Leaves: Plans."""
