//! berth-controlplane: the provider side the node suite talks to (tunnel server, node lifecycle
//! controller, OpenStack API simulator). Built under issues 3 and 4.
