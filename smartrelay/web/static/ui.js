// SmartRelay reports UI. The pages work without this file; it only shows every
// <time datetime="..."> in the viewer's time zone, keeping the UTC time on hover (title).
"use strict";
(function () {
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });
  function localise(root) {
    var times = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var when = new Date(times[i].getAttribute("datetime"));
      if (!isNaN(when.getTime())) {
        times[i].textContent = format.format(when);
      }
    }
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
})();
