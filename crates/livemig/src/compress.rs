//! Page compression. (Placeholder.)
