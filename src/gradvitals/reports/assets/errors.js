// Loaded first: every script error or console.error lands in #gv-errors (and in
// <body data-gv-errors>), so a headless browser's DOM dump shows whether the page broke.
(function () {
  var errors = [];
  function note(msg) {
    errors.push(String(msg));
    var list = document.getElementById("gv-errors");
    if (list) {
      var li = document.createElement("li");
      li.className = "gv-error";
      li.textContent = String(msg);
      list.appendChild(li);
      list.hidden = false;
    }
    if (document.body) document.body.setAttribute("data-gv-errors", String(errors.length));
  }
  window.gvErrors = errors;
  window.addEventListener("error", function (e) {
    note("error: " + (e.message || e.type) + (e.filename ? " at " + e.filename + ":" + e.lineno : ""));
  });
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + e.reason); });
  var orig = console.error;
  console.error = function () {
    note("console.error: " + Array.prototype.join.call(arguments, " "));
    return orig.apply(console, arguments);
  };
})();
