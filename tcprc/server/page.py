"""The status page: one HTML document, its style and script inline, no outside assets.

The script fetches api/devices every 2 s and keeps one table row per device,
updating only the cells that changed, so 1000 devices stay cheap; a click on
a column header sorts, the filter box keeps the rows whose text has every
word typed.  Data only ever reaches the page through textContent, never as
HTML, and the Content-Security-Policy allows exactly this script and style
(by their hashes) and requests to this origin.
"""

import base64
import hashlib

STYLE = """
*{box-sizing:border-box}
body{font:13px system-ui,sans-serif;margin:0;padding:12px 16px;color:#1f2328;background:#f6f8fa}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;margin-bottom:8px}
h1{font-size:18px;margin:0}
#summary{color:#57606a}
#filter{margin-left:auto;width:24em;max-width:100%;padding:4px 8px;font:inherit;
 border:1px solid #d0d7de;border-radius:6px}
#open{margin:0 0 8px;padding:6px 10px;background:#fff8c5;border:1px solid #d4a72c;
 border-radius:6px}
table{width:100%;border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:4px 6px;border-bottom:1px solid #eaeef2;text-align:left;white-space:nowrap;
 vertical-align:top}
th{position:sticky;top:0;background:#eef1f4;font-weight:600;cursor:pointer;user-select:none;
 vertical-align:bottom}
th.num{white-space:normal}
th:hover{background:#e2e6ea}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:9px}
th[aria-sort=descending]::after{content:" \\25BC";font-size:9px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.lines{white-space:pre}
td.wrap{white-space:normal;width:100%;min-width:12em;overflow-wrap:break-word}
td.dim{color:#8c959f}
tr:hover td{background:#f6f8fa}
.up{color:#1a7f37;font-weight:600}.down{color:#57606a}
td.error{color:#cf222e}
"""

BODY = """<header><h1>tcprc fleet</h1><span id="summary">loading&hellip;</span>
<input id="filter" type="search" placeholder="filter: id, state, address, error&hellip;"
 aria-label="filter the devices" autocomplete="off"></header>
<!--OPEN-->
<noscript>This page needs JavaScript; the table is also at api/devices (JSON).</noscript>
<table id="devices"><thead><tr></tr></thead><tbody></tbody></table>"""

OPEN_NOTE = ("<p id=\"open\">No authentication: whoever reaches this address sees this table. "
             "Set <code>[server] http_token</code> to require a login.</p>")

# Columns: the row's key, the header, how a value shows, a class for the cell.
SCRIPT = """
"use strict";
function size(n){var u=["B","KB","MB","GB","TB"],i=0;while(n>=1000&&i<4){n/=1000;i++;}
 return i?n.toFixed(n<100?1:0)+" "+u[i]:n+" B";}
function age(t){if(!t)return "";var s=Math.max(0,Date.now()/1000-t),d=Math.floor(s/86400),
 h=Math.floor(s%86400/3600),m=Math.floor(s%3600/60);
 return d?d+" d "+h+" h":h?h+" h "+m+" min":m?m+" min":Math.floor(s)+" s";}
function ms(r){return r==null?"":(r*1000).toFixed(1)+" ms";}
function text(v){return v==null?"":String(v);}
function ports(v,r){return r.services?v+"\\n"+r.services.split(", ").join("\\n"):v;}
function link(v,r){return v?v+(r.tls&&r.tls!=="off"?", "+r.tls:", no TLS"):"";}
// [key, header, how the value shows (value, row), cell class]; the last one: the error
var COLUMNS=[
 ["id","device",text,""],["state","state",text,""],["host","host port, services",ports,"lines"],
 ["protocol","protocol",link,""],
 ["source","source",text,""],["since","up for",age,""],
 ["streams","streams",text,"num"],["bytes_up","bytes up",size,"num"],
 ["bytes_down","bytes down",size,"num"],["rtt","rtt",ms,"num"],
 ["sessions","sessions",text,"num"],["auth_failures","auth failures",text,"num"],
 ["last_error","last error",text,"wrap"]];
var collate=new Intl.Collator(undefined,{numeric:true,sensitivity:"base"}).compare;
var rows=new Map(),sortKey="id",sortDir=1,words=[],order=[];
var body=document.querySelector("#devices tbody");
function header(){
 var tr=document.querySelector("#devices thead tr");
 COLUMNS.forEach(function(c){var th=document.createElement("th");th.textContent=c[1];
  th.dataset.key=c[0];th.scope="col";if(c[3]==="num")th.className="num";
  th.addEventListener("click",function(){
   if(sortKey===c[0])sortDir=-sortDir;else{sortKey=c[0];sortDir=c[3]==="num"?-1:1;}
   arrange();});
  tr.appendChild(th);});}
function set(node,name,value){if(node[name]!==value)node[name]=value;}
function row(r){
 var entry=rows.get(r.id);
 if(!entry){var tr=document.createElement("tr");tr.dataset.device=r.id;
  COLUMNS.forEach(function(c){var td=document.createElement("td");
   if(c[3])td.className=c[3];tr.appendChild(td);});
  entry={tr:tr,data:null,find:""};rows.set(r.id,entry);}
 var cells=entry.tr.cells;
 COLUMNS.forEach(function(c,i){set(cells[i],"textContent",c[2](r[c[0]],r));});
 set(cells[SINCE],"title",r.since?new Date(r.since*1000).toISOString().replace("T"," ").slice(0,19)+
  " UTC":"");
 set(cells[1],"className",r.state==="up"?"up":"down");
 // a past error of a device that is up again is history, not an alarm
 var err=cells[COLUMNS.length-1],old=r.last_error&&r.state==="up";
 set(err,"className","wrap"+(r.last_error?(old?" dim":" error"):""));
 set(err,"title",old?"before the current session":"");
 entry.data=r;
 entry.find=[r.id,r.state,r.node,r.host,r.services,r.protocol,r.tls,r.source,r.last_error]
  .join(" ").toLowerCase();
 return entry;}
function compare(a,b){
 var x=a.data[sortKey],y=b.data[sortKey];
 if(x==null||x==="")return y==null||y===""?collate(a.data.id,b.data.id):1;
 if(y==null||y==="")return -1;
 var c=typeof x==="number"?x-y:collate(String(x),String(y));
 return c?c*sortDir:collate(a.data.id,b.data.id);}
function arrange(){
 var sorted=Array.from(rows.values()).sort(compare),shown=0,same=sorted.length===order.length;
 for(var i=0;same&&i<sorted.length;i++)same=sorted[i]===order[i];
 if(!same){var frag=document.createDocumentFragment();
  sorted.forEach(function(e){frag.appendChild(e.tr);});body.appendChild(frag);order=sorted;}
 sorted.forEach(function(e){var hit=words.every(function(w){return e.find.indexOf(w)>=0;});
  if(e.tr.hidden===hit)e.tr.hidden=!hit;if(hit)shown++;});
 document.querySelectorAll("#devices th").forEach(function(th){
  if(th.dataset.key===sortKey)th.setAttribute("aria-sort",sortDir>0?"ascending":"descending");
  else th.removeAttribute("aria-sort");});
 return shown;}
var SINCE=5,clustered=false;
function show(list){
 var seen=new Set(),up=0,errors=0;
 if(!clustered&&list.some(function(r){return "node" in r;})){
  // a cluster's server says which node holds each device: a column for it
  clustered=true;COLUMNS.splice(2,0,["node","node",text,""]);SINCE++;
  document.querySelector("#devices thead tr").textContent="";header();
  rows.clear();body.textContent="";order=[];}
 list.forEach(function(r){seen.add(r.id);row(r);if(r.state==="up")up++;
  else if(r.last_error)errors++;});
 rows.forEach(function(e,id){if(!seen.has(id)){e.tr.remove();rows.delete(id);}});
 var shown=arrange();
 document.getElementById("summary").textContent=list.length+" device(s), "+up+" up, "+
  (list.length-up)+" down"+(errors?" ("+errors+" with an error)":"")+
  (shown<list.length?"; "+shown+" shown":"")+"; updated "+
  new Date().toISOString().slice(11,19)+" UTC";}
// without the user:password@ of a login typed into the address (fetch refuses those)
var API=location.origin+location.pathname.replace(/[^/]*$/,"")+"api/devices",last=[];
function refresh(){
 if(document.hidden)return;
 fetch(API,{cache:"no-store"}).then(function(r){
  if(!r.ok)throw new Error("HTTP "+r.status);return r.json();})
 .then(function(list){last=list;show(list);}).catch(function(e){
  document.getElementById("summary").textContent="cannot reach the server: "+e.message;});}
document.getElementById("filter").addEventListener("input",function(ev){
 words=ev.target.value.toLowerCase().split(/\\s+/).filter(Boolean);show(last);});
header();refresh();setInterval(refresh,2000);
document.addEventListener("visibilitychange",refresh);
"""


def _hash(text: str) -> str:
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width\">"
        "<title>tcprc fleet</title><style>%s</style></head><body>\n%s\n<script>%s</script>"
        "</body></html>\n" % (STYLE, BODY, SCRIPT))

# Only this page's own script and style run; it may fetch from its own origin,
# nothing else (no images, frames, forms, plugins, base or embedding).
CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'" % (_hash(SCRIPT), _hash(STYLE)))


def page(with_login: bool) -> bytes:
    """The document; without a login it says so on itself."""
    return PAGE.replace("<!--OPEN-->", "" if with_login else OPEN_NOTE).encode()
