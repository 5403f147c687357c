"""datahaul: move large files from robots and vehicles to a center system."""
