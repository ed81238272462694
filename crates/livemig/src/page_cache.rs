//! XBZRLE page cache. (Placeholder.)
