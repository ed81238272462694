//! Page codecs: how one page becomes one record and back.
//!
//! Every page the source sends goes through [`zero`] detection first; after
//! the bulk stage a page seen before may become an [`xbzrle`] delta against
//! its copy in the [`page_cache`]; otherwise it is [`compress`]ed (when that
//! pays) or sent raw. The `encoder` module makes that choice, for the main
//! stream and every page channel alike, deciding from measured costs
//! (`adapt`). The destination runs the same codecs backwards, each
//! bounded by one page.

pub(crate) mod adapt;
pub mod compress;
pub mod diff;
pub(crate) mod encoder;
pub mod page_cache;
pub mod xbzrle;
pub mod zero;
