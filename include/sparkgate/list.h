/* Intrusive doubly linked list: an object sits in as many lists as it has
 * nodes, and unlinking is O(1) without searching. */
#ifndef SPARKGATE_LIST_H
#define SPARKGATE_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct sg_list {
  struct sg_list *prev, *next;
} sg_list;

#define SG_CONTAINER_OF(ptr, type, member)                                     \
  ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void sg_list_init(sg_list *head) { head->prev = head->next = head; }

static inline bool sg_list_empty(const sg_list *head) { return head->next == head; }

/* A node that was initialised or unlinked is "not linked"; unlinking it
 * again is harmless, which keeps teardown paths simple. */
static inline bool sg_list_linked(const sg_list *node) {
  return node->next != NULL && node->next != node;
}

static inline void sg_list_push_back(sg_list *head, sg_list *node) {
  node->prev = head->prev;
  node->next = head;
  head->prev->next = node;
  head->prev = node;
}

static inline void sg_list_unlink(sg_list *node) {
  if (!sg_list_linked(node))
    return;
  node->prev->next = node->next;
  node->next->prev = node->prev;
  node->prev = node->next = node;
}

#endif
