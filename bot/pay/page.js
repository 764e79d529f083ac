/* The pay page: order, pay (WeChat's sheet, or a QR code), then ask the bot until it has
   credited the order. The sheet's "ok" proves nothing; only the bot's "paid" is shown as
   到账. No library, no request beyond this site. */
(function () {
  "use strict";
  var root = document.getElementById("pay");
  if (!root || !window.fetch) { return; }
  var d = root.dataset, unit = d.unit, busy = false;
  var box = document.getElementById("status");
  var text = document.getElementById("status-text");
  var qr = document.getElementById("qr");
  var extra = document.getElementById("status-extra");
  var link = "u=" + encodeURIComponent(d.u) + "&e=" + encodeURIComponent(d.e) +
    "&s=" + encodeURIComponent(d.s);

  function show(message, kind) {
    var appearing = box.hidden;
    box.hidden = false;
    if (appearing && box.scrollIntoView) { box.scrollIntoView({ block: "center" }); }
    box.className = "paystatus" + (kind ? " " + kind : "");
    text.textContent = message;
    extra.textContent = "";
  }

  function line(message, cls) {
    var p = document.createElement("p");
    if (cls) { p.className = cls; }
    p.textContent = message;
    extra.appendChild(p);
    return p;
  }

  function anchor(href, label, cls) {
    var a = document.createElement("a");
    a.href = href;
    a.className = cls;
    a.textContent = label;
    extra.appendChild(a);
  }

  function buttons(enabled) {
    var all = document.querySelectorAll("button.pkg");
    for (var i = 0; i < all.length; i++) { all[i].disabled = !enabled; }
    busy = !enabled;
  }

  function json(response) {
    return response.json().catch(function () { return {}; }).then(function (body) {
      if (!response.ok) { throw body; }
      return body;
    });
  }

  function credited(order) {
    qr.hidden = true;
    show("", "ok");
    var big = document.createElement("span");
    big.className = "big";
    big.textContent = "到账 +" + order.tokens + " " + unit;
    text.appendChild(big);
    if (typeof order.balance === "number") {
      var b = document.getElementById("balance");
      if (b) { b.textContent = order.balance; }
      line("当前余额 " + order.balance + " " + unit);
    }
    if (order.unlocked && order.issue) {
      var offer = document.querySelector(".offer");
      if (offer) { offer.hidden = true; }  // bought: nothing left to offer
      line("已解锁第 " + order.issue + " 期");
      if (order.read_url) { anchor(order.read_url, "阅读第 " + order.issue + " 期全文", "read"); }
    } else if (order.issue) {
      line("第 " + order.issue + " 期未能自动解锁（" + (order.unlock_reason || "请稍后再试") +
        "），" + unit + "已到账，可回到对话回复「兑换 " + order.issue + "」。", "small");
    }
    line("回到公众号对话，回复「余额」可查看明细。", "small");
    buttons(true);
  }

  function poll(no, started) {
    var waited = Date.now() - started;
    fetch("orders/" + encodeURIComponent(no) + "?" + link, { credentials: "same-origin" })
      .then(json)
      .then(function (order) {
        if (order.status === "paid") { credited(order); return; }
        if (order.status === "closed" || order.status === "failed") {
          qr.hidden = true;
          show("订单已关闭，没有扣款。可以重新选择套餐。", "err");
          buttons(true);
          return;
        }
        if (waited > Number(d.ttl) * 1000) {
          show("还没有收到这笔付款。若已付款，稍后回到对话回复「余额」查看。");
          buttons(true);
          return;
        }
        window.setTimeout(function () { poll(no, started); }, waited < 20000 ? 1500 : 4000);
      })
      .catch(function () {
        window.setTimeout(function () { poll(no, started); }, 4000);
      });
  }

  function refused(message) {
    show(message || "支付没有完成，没有扣款。", "err");
    line("若微信提示「下单账号与支付账号不一致」：这个链接只能为它的主人充值，" +
      "请在本人的微信中打开此链接。", "small");
    buttons(true);
  }

  function sheet(order) {
    function invoke() {
      window.WeixinJSBridge.invoke("getBrandWCPayRequest", order.jsapi, function (res) {
        var said = (res && res.err_msg) || "";
        if (/:ok$/.test(said)) {
          show("正在确认到账，请稍候…");
          poll(order.out_trade_no, Date.now());
        } else if (/:cancel$/.test(said)) {
          show("已取消支付，没有扣款。");
          buttons(true);
        } else if (/不一致/.test(((res && res.err_desc) || "") + said)) {
          refused("请在本人的微信中打开此链接：这个链接只能为它的主人充值。");
        } else {
          refused();
        }
      });
    }
    if (window.WeixinJSBridge && window.WeixinJSBridge.invoke) {
      invoke();
    } else {
      document.addEventListener("WeixinJSBridgeReady", invoke, false);
    }
  }

  function code(order) {
    qr.src = order.qr;
    qr.hidden = false;
    box.hidden = true;  // scrolled into view again, now with the code in it
    show("请用手机微信「扫一扫」扫描二维码，支付 ¥" + order.price);
    line("付款后本页会自动显示到账结果。", "small");
    if (order.demo_pay_url) {
      var p = line("本机演示：", "small demo");
      var a = document.createElement("a");
      a.href = order.demo_pay_url;
      a.target = "_blank";
      a.rel = "noopener";
      a.textContent = "在假微信支付页面付款";
      p.appendChild(a);
    }
    poll(order.out_trade_no, Date.now());
  }

  function order(button) {
    if (busy) { return; }
    buttons(false);
    qr.hidden = true;
    show("正在下单…");
    var body = { u: d.u, e: d.e, s: d.s, package: button.dataset.package, kind: d.kind };
    if (button.dataset.issue) { body.issue = Number(button.dataset.issue); }
    fetch("orders", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body)
    })
      .then(json)
      .then(function (made) { if (made.jsapi) { sheet(made); } else { code(made); } })
      .catch(function (err) {
        show((err && err.message) || "网络不稳定，请稍后再试。", "err");
        buttons(true);
      });
  }

  root.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button.pkg") : null;
    if (button) { order(button); }
  });
}());
