"""Layer-wise probes over extracted stores (see DESIGN.md section 7)."""
