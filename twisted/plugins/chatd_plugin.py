from twisted.application.service import ServiceMaker

chatd = ServiceMaker("chatd", "chatd.app.tap", "Persistent mobile chat server (line-delimited JSON over TCP, Redis-backed).", "chatd")
