//! FUSE frontend: serves Strata volumes and trees over FUSE. Not implemented yet (issues 4 and 5).
