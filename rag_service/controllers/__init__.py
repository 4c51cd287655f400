"""HTTP controllers, one module per area of the contract."""
