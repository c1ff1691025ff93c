// Loaded before RequireJS and the ipywidgets HTML manager on pages with widgets (_config.yml, nb_ipywidgets_js);
// `make assets` copies it to _build/html/_static/offline/.
(function () {
  // This script's folder (_static/offline/), however deep the page is and whether it is served or opened from disk.
  var here = document.currentScript.src.replace(/[^\/]*$/, '');

  // RequireJS reads a global `require` object as its configuration. Each module embed-amd.js defines
  // ('@jupyter-widgets/controls', '@jupyter-widgets/html-manager/dist/libembed-amd', ...) locates its Font Awesome
  // fonts from its own module URL, which by default resolves next to the page; map them all to the folder the
  // bundle and its fonts were copied to.
  var widgets = here + 'widgets';
  window.require = {paths: {'@jupyter-widgets': widgets, '@jupyter-widgets/html-manager/dist': widgets}};

  // ipywidgets typesets widget labels with the MathJax 2 API (MathJax.Hub.Queue) whenever window.MathJax exists;
  // the book loads MathJax 3, which has no Hub, so every labelled widget on a page with equations would throw.
  // Translate the call to MathJax 3. Deferred MathJax has run by DOMContentLoaded; widgets render at load.
  document.addEventListener('DOMContentLoaded', function () {
    var mj = window.MathJax;
    if (!mj || !mj.version || mj.Hub) {
      return;
    }
    mj.Hub = {
      Queue: function (command) {
        var element = command && command[2];
        if (element && mj.startup && mj.startup.promise && mj.typesetPromise) {
          mj.startup.promise.then(function () { return mj.typesetPromise([element]); }).catch(function () {});
        }
      }
    };
  });
})();
