// Loaded on pages with saved ipywidgets, after require.js and before the vendored
// @jupyter-widgets/html-manager (see nb_ipywidgets_js in scripts/make_book_config.py).
(function () {
  "use strict";
  var here = document.currentScript && document.currentScript.src;

  // 1. The widget bundle locates its icon fonts relative to its AMD module ids
  //    (@jupyter-widgets/...), i.e. relative to the page unless RequireJS maps them.
  //    Map every @jupyter-widgets module onto the vendored folder that holds the fonts.
  if (here && window.require && window.require.config) {
    var dir = new URL("vendor/html-manager", here).href;
    window.require.config({
      paths: { "@jupyter-widgets": dir, "@jupyter-widgets/html-manager/dist": dir },
    });
  }

  // 2. @jupyter-widgets/base typesets widget labels with the MathJax 2 API
  //    (MathJax.Hub.Queue) whenever window.MathJax exists; the book loads MathJax 3.
  //    Provide that one call on top of MathJax 3, on pages that load MathJax at all.
  if (!document.querySelector('script[src*="mathjax"]')) return;
  var pending = [];
  function typeset(el) {
    var MJ = window.MathJax;
    if (MJ && MJ.version && MJ.typesetPromise && MJ.startup && MJ.startup.promise) {
      MJ.startup.promise
        .then(function () { return MJ.typesetPromise(el ? [el] : undefined); })
        .catch(function (err) { console.warn("MathJax typeset of a widget failed", err); });
    } else {
      pending.push(el);
    }
  }
  var hub = {
    Queue: function (cmd) { typeset(Array.isArray(cmd) ? cmd[2] : undefined); },
  };
  var mj = window.MathJax;
  if (mj && mj.version) { // MathJax 3 already started
    mj.Hub = mj.Hub || hub;
    return;
  }
  // Still the configuration object: MathJax 3 replaces it with itself when it loads.
  mj = window.MathJax = mj || {};
  mj.startup = mj.startup || {};
  var ready = mj.startup.ready;
  mj.startup.ready = function () {
    if (ready) { ready(); } else { window.MathJax.startup.defaultReady(); }
    window.MathJax.Hub = hub;
    pending.splice(0).forEach(typeset);
  };
  // Calls made before MathJax 3 replaced the configuration object are queued.
  Object.defineProperty(mj, "Hub", { value: hub, enumerable: false, configurable: true });
})();
