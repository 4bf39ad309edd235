//! Native plugins compiled into pwhost.
