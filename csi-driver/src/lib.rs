//! berth-csi: CSI Identity/Controller/Node services backed by OpenStack Cinder and Nova.
//! (Being built under issue 4.)
