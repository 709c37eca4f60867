//! vhost-user-blk frontend: serves Strata volumes to hypervisors. Not implemented yet (issue 3).
