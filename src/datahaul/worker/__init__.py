"""Workers: consume packets, stage them, assemble and store whole files."""
